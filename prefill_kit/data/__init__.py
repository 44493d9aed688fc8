"""Data I/O: read rows from every supported file type with their locations, detect chat formats, write outputs
atomically.
"""

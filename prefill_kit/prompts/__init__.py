"""Prompts: render conversations into prefilled prompts and their exact token ids, for one row, a dataset or a file."""

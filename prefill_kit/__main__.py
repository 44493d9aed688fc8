from prefill_kit.cli import main

raise SystemExit(main())

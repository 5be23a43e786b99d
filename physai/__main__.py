from physai.cli import main

raise SystemExit(main())

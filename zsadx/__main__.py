from zsadx.cli import main

raise SystemExit(main())

from stmdit.cli import main

raise SystemExit(main())

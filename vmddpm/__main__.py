from vmddpm.cli import main

raise SystemExit(main())

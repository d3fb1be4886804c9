from skinray.cli import main

raise SystemExit(main())

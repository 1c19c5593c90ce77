from chatcore.cli import main

raise SystemExit(main())

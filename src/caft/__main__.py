from caft.cli import main

raise SystemExit(main())

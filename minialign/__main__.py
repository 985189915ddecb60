from minialign.cli import main

raise SystemExit(main())

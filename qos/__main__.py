from qos.cli import main

raise SystemExit(main())

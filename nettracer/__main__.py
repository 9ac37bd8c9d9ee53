from nettracer.cli.main import main

raise SystemExit(main())

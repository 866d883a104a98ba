from modelport.cli.main import main

raise SystemExit(main())

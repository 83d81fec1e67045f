from warp_phys.cli import main

raise SystemExit(main())

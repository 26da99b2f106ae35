from saliency_service.cli import main

raise SystemExit(main())

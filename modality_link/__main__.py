from modality_link.cli import main

raise SystemExit(main())

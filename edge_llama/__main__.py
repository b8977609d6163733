from edge_llama.cli import main

raise SystemExit(main())

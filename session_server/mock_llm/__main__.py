import sys

from session_server.mock_llm import main

sys.exit(main())

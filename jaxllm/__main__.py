import sys

from jaxllm.launch import main

sys.exit(main())

import sys

try:
    from jaxllm.launch import main
except KeyboardInterrupt:  # Ctrl-C before main holds it (jaxllm.launch): no traceback either
    print("jaxllm: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())

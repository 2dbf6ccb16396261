"""python -m x2v_gateway.demo --host 127.0.0.1 --port 8000 --data-dir /tmp/node1"""

from .node import main

main()

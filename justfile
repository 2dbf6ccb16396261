# Everyday commands; each one sets up what it needs through ./dev.

# Run the gateway (demo node when X2V_NODES is empty)
serve:
    ./dev serve

# Run the whole test suite
test *ARGS:
    ./dev test {{ARGS}}

# Run the benchmarks and print their figures
bench:
    ./dev bench

# Run a standalone demo node on a port
demo-node port="8001":
    ./dev demo-node --port {{port}}

"""selectd's benchmark: selectd against the stdlib's socketserver, asyncio and xinetd.

Run it with `python3 scripts/bench.py` (see cli.py for the options). The pieces, one job each:

- loadgen.c / loadgen.py: the C epoll load generator, its build and a bounded run of it;
- targets.py: the Target abstraction (start -> ports and a process to measure, stop);
  peers.py: the stdlib peers it starts; xinetd.py and selectd.py: the other targets;
- ports.py: free loopback ports and waiting until a server accepts;
- proctree.py: CPU, memory and wake-ups of a process tree, and ending one cleanly;
- throughput.py: the A/B throughput section; scale.py: the idle and scale section;
- report.py: medians, ratios, tables and the results files; cli.py: the command line.
"""

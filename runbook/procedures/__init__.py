"""Day-2 procedures on a running cluster: switchover and rolling restarts, the security audit, fault drills."""

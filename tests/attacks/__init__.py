"""Attack files built byte by byte, their benign twins, malformed files, and the harness that
proves each attack real by running its natural loader in a child process that blocks the
payload."""

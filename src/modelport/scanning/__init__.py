"""Is it safe to load? Static analysis of every container and pickle a loader would read, never
executing it. Imports formats, pickles, tree and below."""

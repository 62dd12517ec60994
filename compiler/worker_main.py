"""What worker processes lmc starts run as their ``__main__`` (multiprocessing prepares each worker by
importing the parent's main module; lmc names this one instead of the program's, so a worker never runs a
script's top-level code again). Deliberately empty: the work itself is unpickled from library modules."""

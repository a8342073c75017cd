from bench.run import main

if __name__ == "__main__":  # spawned benchmark processes import this module too
    raise SystemExit(main())

from warp_phys.cli import main

if __name__ == "__main__":  # not when a spawned process (a dask worker) imports this module
    raise SystemExit(main())

from warp_phys.cli import run

if __name__ == "__main__":  # not when a spawned process (a dask worker) imports this module
    run()

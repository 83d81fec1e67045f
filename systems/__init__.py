"""Built-in dynamical systems, one file each; every module here is found automatically."""

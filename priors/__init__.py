"""Root-network families (priors), one file each; every module here is found automatically."""

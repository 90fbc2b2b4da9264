"""Search spaces (``tune/spaces/*.yaml``) and a thin sweep entry point over ``acol_core.jobs.sweep``."""

"""Reports: tables and plots made from result records only (the only place numbers are rounded)."""

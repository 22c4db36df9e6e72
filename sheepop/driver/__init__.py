"""The driver: decides the run plan once, starts the ranks (in-process or Ray Train), follows them."""

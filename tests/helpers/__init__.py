"""Helpers the tests share: images, processes (started in their own group, always stopped),
fault injection, a live `b4m serve`, API and database shortcuts."""

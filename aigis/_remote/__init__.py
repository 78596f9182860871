"""Plugins on other hosts: host specs, one OpenSSH master connection per host, shipping."""

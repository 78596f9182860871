"""Plugins on other hosts: host specs, one OpenSSH master connection per host, shipping.

What a remote host needs beforehand: sshd accepting the core's key (for root, or a user
allowed to write /var/lib/aigis and run systemctl), systemd as PID 1, and python3 >= 3.11.
No rsync, no agent: shipping runs the standard-library script ``syncer.py`` with that python3.
The core needs the host's key in its known_hosts (it never accepts new or changed keys).
"""

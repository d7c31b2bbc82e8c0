"""libvirt side: daemons, acceleration, connection, templates, domains, images."""

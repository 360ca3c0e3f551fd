"""NBD wire format and client, shared by the server frontend and the NBD sources."""

"""Remote control: the pidbox mailbox, inspect and control."""

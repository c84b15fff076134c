"""Files written whole or not at all, and files read without executing anything."""

"""Registry commands of the nanorun CLI: runs, show, leaderboard, query, registry rebuild."""

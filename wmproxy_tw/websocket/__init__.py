"""websocket capability."""

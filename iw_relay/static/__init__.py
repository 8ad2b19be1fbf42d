"""Static files the relay serves: client.js (IWRelaySocket), read by iw_relay.clientjs."""

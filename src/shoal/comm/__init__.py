"""Communication: codecs (what is sent), wire metering (what it cost)."""

"""The contract: a transaction payload in, the 14-dimension vector out."""

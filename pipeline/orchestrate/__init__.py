"""The only package that talks to Ray: parallel tasks now, the job driver later."""

"""Bus topics: the first frame of every message. One place, so no service spells one itself."""

RAW = b"raw"  # ingest -> storage: complete lines as received, per connection chunk
READING = b"reading"  # storage -> power, plotter: validated readings
REJECTED = b"rejected"  # ingest, storage -> anyone: bad lines with a reason
POWER = b"power"  # power -> storage, plotter: watts = volts x amps per circuit
STATS = b"stats"  # every service, once a second: its counters
ACK = b"ack"  # storage -> ingest: the last raw sequence number durably applied, per ingest

ALL = (RAW, READING, REJECTED, POWER, STATS, ACK)
BY_NAME = {t.decode(): t for t in ALL}

"""An independent Kafka client (kafka-python, PyPI) for tests/kafka.rs: reads and writes wisp's
records on a node topic as anyone with access to the topic could, without wisp's code.

  records.py BROKER dump TOPIC PARTITION
      one line per record: OFFSET KEY_HEX SEQ VALUE_LEN
  records.py BROKER write TOPIC PARTITION KEY_HEX VALUE_HEX
      append one record
  records.py BROKER renumber TOPIC PARTITION OFFSET SEQ
      append a copy of the record at OFFSET with its frame number set to SEQ (a replay that
      pretends to be the next frame)
"""
import struct
import sys

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

broker, cmd, topic, partition = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def records():
    c = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False, consumer_timeout_ms=2000)
    tp = TopicPartition(topic, partition)
    c.assign([tp])
    c.seek(tp, 0)
    out = list(c)
    c.close()
    return out


def produce(key, value):
    p = KafkaProducer(bootstrap_servers=broker)
    p.send(topic, key=key, value=value, partition=partition).get(timeout=10)
    p.close()


if cmd == "dump":
    for r in records():
        seq = struct.unpack(">Q", r.value[:8])[0] if r.value and len(r.value) >= 8 else -1
        print(r.offset, (r.key or b"").hex(), seq, len(r.value or b""))
elif cmd == "write":
    produce(bytes.fromhex(sys.argv[5]), bytes.fromhex(sys.argv[6]))
elif cmd == "renumber":
    offset, seq = int(sys.argv[5]), int(sys.argv[6])
    r = next(r for r in records() if r.offset == offset)
    produce(r.key, struct.pack(">Q", seq) + r.value[8:])
else:
    sys.exit(f"unknown command {cmd}")

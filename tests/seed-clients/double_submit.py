"""A double submit with the guide's Python client: two `create_order` calls with one key, 50 ms
apart. Prints one JSON line: what each caller ended with.
Usage: python double_submit.py http://127.0.0.1:10000 KEY"""

import json
import sys
import threading
import time

from wms_client import WMSClient

client = WMSClient(sys.argv[1])
key = sys.argv[2]
order = {"customerId": "CUST-001", "priority": "standard", "items": [{"sku": "SKU-001", "quantity": 2, "price": 29.99}]}
results = [None, None]


def submit(index):
    try:
        results[index] = {"orderId": client.create_order(order, idempotency_key=key)["orderId"]}
    except Exception as error:  # what the caller ends with, whatever it is
        results[index] = {"error": type(error).__name__, "message": str(error)}


threads = [threading.Thread(target=submit, args=(i,)) for i in range(2)]
threads[0].start()
time.sleep(0.05)
threads[1].start()
for thread in threads:
    thread.join()
print(json.dumps(results))

"""The seed guide's Python client ("For Client Developers" -> "Python"), copied as the guide
gives it; the error classes it raises without showing are defined first."""


class ConcurrentRequestError(Exception):
    pass


class ParameterMismatchError(Exception):
    pass


class MaxRetriesExceededError(Exception):
    pass


import uuid
import requests
import time
from typing import Dict, Any, Optional

class WMSClient:
    def __init__(self, base_url: str):
        self.base_url = base_url

    def create_order(
        self,
        order_data: Dict[str, Any],
        idempotency_key: Optional[str] = None,
        max_retries: int = 3
    ) -> Dict[str, Any]:
        """Create an order with automatic retry on 409 Conflict."""

        if idempotency_key is None:
            idempotency_key = str(uuid.uuid4())

        for attempt in range(max_retries):
            try:
                response = requests.post(
                    f'{self.base_url}/api/v1/orders',
                    json=order_data,
                    headers={
                        'Content-Type': 'application/json',
                        'Idempotency-Key': idempotency_key
                    }
                )

                if response.status_code in [200, 201]:
                    return response.json()

                if response.status_code == 409:
                    # Concurrent request - retry with backoff
                    if attempt < max_retries - 1:
                        time.sleep((2 ** attempt) * 0.1)  # 100ms, 200ms, 400ms
                        continue
                    raise ConcurrentRequestError(response.json())

                if response.status_code == 422:
                    raise ParameterMismatchError(response.json())

                response.raise_for_status()

            except requests.RequestException as e:
                if attempt < max_retries - 1:
                    time.sleep((2 ** attempt) * 0.1)
                    continue
                raise

        raise MaxRetriesExceededError(f'Failed after {max_retries} attempts')


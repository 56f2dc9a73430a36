"""Protocol-independent types shared by every layer: requests, results, errors."""

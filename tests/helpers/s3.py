"""A real S3 server on loopback for the object-storage tests: moto's server (`moto[server]`),
started by the test on a free port of 127.0.0.1 (tests.helpers.servers), stopped by PID. Clients
reach it through the standard AWS_* variables that `env()` returns (dummy keys; the metadata
service is switched off so no SDK ever asks the network for an instance role)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sheepop.net import free_port
from tests.helpers import servers

DUMMY_KEY, DUMMY_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


class S3Server:
    def __init__(self, log_dir: Path, enforce_auth_after: int | None = None):
        """enforce_auth_after=N: moto checks signatures and IAM policies after N unauthenticated
        requests (for the permission tests); None: any credentials are accepted."""
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {**os.environ}
        if enforce_auth_after is not None:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(enforce_auth_after)
        moto = Path(sys.executable).parent / "moto_server"
        self.proc, self.log = servers.start([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                            Path(log_dir) / f"moto-{self.port}.log", self.endpoint + "/moto-api/",
                                            "moto_server", env=env)

    def env(self, **extra: str) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": DUMMY_KEY,
                "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", **extra}

    def client(self, service: str = "s3", **creds):
        import boto3

        e = self.env()
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=creds.get("key", e["AWS_ACCESS_KEY_ID"]),
                            aws_secret_access_key=creds.get("secret", e["AWS_SECRET_ACCESS_KEY"]))

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def read_only_user(self) -> dict[str, str]:
        """Credentials of an IAM user that may read and list but not write."""
        iam = self.client("iam")
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """{key: size} of every object under a prefix."""
        out, token = {}, None
        s3 = self.client()
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = s3.list_objects_v2(**kw)
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def read(self, bucket: str, key: str) -> str:
        """An object's text; "" when there is none (yet)."""
        try:
            return self.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except self.client().exceptions.NoSuchKey:
            return ""

    def stop(self) -> None:
        servers.stop(self.proc, self.log)

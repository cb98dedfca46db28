const decodedData = typeof Uint8Array.fromBase64 === 'function' ? Uint8Array.fromBase64(encodedData) : await decodeBase64WithProgress(encodedData);
